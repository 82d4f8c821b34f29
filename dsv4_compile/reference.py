"""The reference (eager) model of a build, made the same way by `build` and by `verify`'s worker.

Seeded weights are created on the build's device (a GPU build creates them on the GPU: seconds instead
of minutes for mini), so they depend on the device, and build and verify both create them there.
"""
from __future__ import annotations

from .checkpoint.load import WEIGHT_MODES  # noqa: F401  (re-exported: the engines' weight formats)

# The engines' weight formats are from_pretrained's weight modes (`build --weights-format`, recorded as
# the manifest's weights["format"]): "as-shipped", FP8 linears and MXFP4 routed experts as a release
# ships them (checkpoint/shipped.py), or "bf16", every weight in the config's dtype: the default, and
# what builds made before the key existed.
DEFAULT_WEIGHTS_FORMAT = "bf16"


def weights_format(weights: dict) -> str:
    """The weight format of a manifest's `weights` record (the default when it has none: an older build)."""
    return weights.get("format", DEFAULT_WEIGHTS_FORMAT)


def eager_model(config, *, seed: int, state: dict | None, cuda: bool, as_shipped: bool = False):
    """The reference model: loaded weights (`state`, kept as given; one holding shipped formats, FP8
    codes or MXFP4 experts, gets their modules), else seeded ones; with `as_shipped`, those weights
    quantized as a release ships them (checkpoint/shipped.py); eval, no grad."""
    import torch

    from .checkpoint.shipped import quantize_as_shipped, shipped_modules
    from .model import Transformer

    device = "cuda" if cuda else "cpu"
    with torch.device(device):
        model = Transformer(config, seed=None if state is not None else seed)
    if state is not None:
        shipped_modules(model, state)
        model.load_state_dict(state, strict=True, assign=True)  # keeps the state's tensors (and devices)
        model = model.to(device)
    if as_shipped:
        quantize_as_shipped(model)
    return model.eval().requires_grad_(False)


def float32_twin(model, cuda: bool):
    """`model` computing in float32 with exactly its weight values (bf16 upcast; FP8 codes, MXFP4
    experts and their scales kept as they are), on the GPU (`cuda`) or the CPU; `model` itself when it
    already is float32 on that device."""
    device = "cuda" if cuda else "cpu"
    if model.config.dtype == "float32":
        return model.to(device)
    # load_state_dict(assign=True) keeps these tensors: they must already sit on the twin's device
    state = {k: (v.float() if v.is_floating_point() and v.element_size() > 1 else v).to(device)
             for k, v in model.state_dict().items()}
    return eager_model(model.config.replace(dtype="float32"), seed=0, state=state, cuda=cuda)


def checkpoint_state(path: str, config, strict_mtp: bool = True, weights: str = "bf16") -> tuple[dict, object]:
    """A released checkpoint folder -> (the state_dict of `config`'s model, FP8 / MXFP4 dequantized to
    its dtype (`weights` "bf16") or kept as shipped ("as-shipped": from_pretrained's), on the CPU; the
    config loaded: MTP off when the checkpoint has no MTP tensors, an error instead with `strict_mtp`). CheckpointError (every bad tensor, one line each) as a UsageError."""
    from .checkpoint import from_pretrained

    model = _checked_checkpoint(path, config, strict_mtp,
                                lambda: from_pretrained(path, config=config, weights=weights, device="cpu"))
    return model.state_dict(), model.config


def checkpoint_config(path: str, config, strict_mtp: bool = True):
    """checkpoint_state's checks and config from the checkpoint's headers alone, no tensor read: for a
    parallel build, whose ranks each read their own shard (`checkpoint_shard`)."""
    from .checkpoint import check_checkpoint

    return _checked_checkpoint(path, config, strict_mtp, lambda: check_checkpoint(path, config=config)).config


def _checked_checkpoint(path: str, config, strict_mtp: bool, load):
    """load() (a Transformer of the checkpoint at `path`), its CheckpointError and, with `strict_mtp`, a
    checkpoint without the MTP tensors `config` has, as a UsageError (one line)."""
    import warnings

    from .arguments import UsageError
    from .checkpoint import CheckpointError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the MTP note: handled below
            model = load()
    except CheckpointError as err:
        raise UsageError(f"--weights {path!r}: {err}") from None
    if strict_mtp and model.config.n_mtp_layers != config.n_mtp_layers:
        raise UsageError(f"--weights {path!r}: no MTP tensors, but config {config.name!r} has {config.n_mtp_layers} "
                         f"MTP layer(s); pass a config with n_mtp_layers: 0")
    return model


def checkpoint_shard(path: str, config, layout, cuda: bool, role: str = "engines", weights: str = "bf16"):
    """This rank's shard of the checkpoint at `path` (`config`, from checkpoint_config), FP8 / MXFP4
    dequantized to its dtype (or kept as shipped: `weights`, from_pretrained's) on the build's device,
    each sharded tensor read as its part alone (from_pretrained's parallel loading), over this process's mesh for `role` (distributed.process_mesh:
    the engines' own groups, not the default group's); eval, no grad. Every rank calls this together."""
    from .checkpoint import from_pretrained
    from .distributed import process_mesh

    device = "cuda" if cuda else "cpu"
    model = from_pretrained(path, config=config, weights=weights, device=device, parallel=layout,
                            mesh=process_mesh(layout, device, role))
    return model.requires_grad_(False)


def build_reference(manifest, config, bucket: int, dtype: str):
    """The eager reference of one engine of a build (`manifest`): the build's weights (its seed, its
    weights file or its checkpoint folder), at the engine's context `bucket` and compute `dtype`, on the build's device.
    A parallel build's (its manifest has a `mesh`): this rank's shard of it, as the build made its engines
    (every rank of the build's world calls this together); of a checkpoint in its own dtype, read as
    the shard alone (checkpoint_shard). In the build's weights format (`weights_format`)."""
    weights = manifest.weights or {"source": "seed", "seed": 0}
    cuda, fmt = manifest.device.get("kind") == "cuda", weights_format(weights)
    if manifest.mesh is not None and weights.get("source") == "checkpoint" and dtype == config.dtype:
        from .model.parallel import ParallelLayout

        return checkpoint_shard(weights["path"], config.replace(max_seq_len=bucket),
                                ParallelLayout.parse(manifest.mesh["layout"]), cuda, role="reference", weights=fmt)
    state = None
    if weights.get("source") == "file":
        from safetensors.torch import load_file

        state = load_file(weights["path"])
    elif weights.get("source") == "checkpoint":
        # a parallel build's float32 twin: read whole, then sharded
        state, _ = checkpoint_state(weights["path"], config, weights=fmt)
    model = eager_model(config.replace(max_seq_len=bucket), seed=int(weights.get("seed", 0)), state=state, cuda=cuda,
                        as_shipped=fmt == "as-shipped" and weights.get("source") != "checkpoint")
    model = model if dtype == config.dtype else float32_twin(model, cuda=cuda)
    if manifest.mesh is not None:
        from .distributed import sharded_model
        from .model.parallel import ParallelLayout

        model = sharded_model(model, ParallelLayout.parse(manifest.mesh["layout"]), "cuda" if cuda else "cpu",
                              role="reference")
    return model
