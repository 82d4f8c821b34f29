#!/bin/bash
# One step of a session on a lent GPU machine (no network): `bash bench/gpu_session.sh STEP [STEP ...]`,
# each step sized to fit one 10-minute device call; outputs under $OUT (or /tmp/gpu-out).
# Wheels the image lacks (Optuna and its needs, pytest-xdist, execnet) are read from .whl/ when present.
# The image's Python loads an older libstdc++ than torch's AOTInductor packages need: LD_PRELOAD below.
set -o pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
export LD_PRELOAD=${LD_PRELOAD:-/lib/x86_64-linux-gnu/libstdc++.so.6} PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
# The tests import the installed package (tests/conftest.py takes the checkout off sys.path): install this
# tree's copy beside the wheels; the checkout stays on the path for the bench scripts' own imports.
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
  --target /tmp/site . >/dev/null || exit 1
export PYTHONPATH=/tmp/site:$PWD
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -o 'H[12]00' | head -1)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
# ncu_each_config NAME KERNEL_REGEX KERNELS_A_LAUNCH CONFIGS SCRIPT [ARGS ...]: ncu (--set full) of one launch of each
# config (CONFIGS ';'-separated, '' the default; the script's first launch, which compiles, skipped), details
# appended to $OUT/NAME.txt and a summary of the SASS lines to $OUT/NAME_sass.md
ncu_each_config() {
  local name=$1 regex=$2 count=$3 cfgs=$4 i=0 cfg cfg_list
  shift 4
  IFS=';' read -ra cfg_list <<< "$cfgs"
  if [ -z "$cfgs" ] || [ "${cfgs: -1}" = ";" ]; then cfg_list+=(""); fi
  for cfg in "${cfg_list[@]}"; do
    echo "==== ncu: config '$cfg'" >> "$OUT/$name.txt"
    ncu --clock-control none --set full -k "regex:$regex" --launch-skip "$count" --launch-count "$count" -f \
      -o "/tmp/${name}_$i" python3 "$@" --configs "$cfg" --no-time > "/tmp/${name}_$i.log" 2>&1 || tail -5 "/tmp/${name}_$i.log"
    ncu -i "/tmp/${name}_$i.ncu-rep" --page details >> "$OUT/$name.txt" 2>&1
    ncu -i "/tmp/${name}_$i.ncu-rep" --page source --csv --print-source sass > "/tmp/${name}_sass_$i.csv" 2>&1
    (echo "## config '$cfg'"; python3 bench/ncu_sass_summary.py "/tmp/${name}_sass_$i.csv") >> "$OUT/${name}_sass.md"
    i=$((i + 1))
  done
}
PYTEST="python3 -m pytest -v -p no:cacheprovider -rs"  # -v: a run the call cuts short still names what passed
for step in "$@"; do
  echo "== $step $(date -u +%H:%M:%S)"
  case $step in
    build-mini)       # issue 16: the user's main job, verify included, within 10 minutes
      /usr/bin/time -v python3 -m dsv4_compile build --gpu "$GPU" --config mini --context 8k --out /tmp/mini8k 2>&1 \
        | grep --line-buffered -v "UserWarning\|warnings.warn" | tee "$OUT/build_mini_8k.log"
      cp /tmp/mini8k/manifest.json "$OUT/manifest_mini_8k.json" 2>/dev/null; du -sh /tmp/mini8k 2>/dev/null
      rm -rf /tmp/mini8k ;;  # 10 GB of a 64 GiB disk the next steps need
    build-flash-slice) # V4-Flash's shapes, 256 experts, as shipped (bf16 does not fit a 64 GiB disk)
      /usr/bin/time -v python3 -m dsv4_compile build --gpu "$GPU" --config flash-slice --context 8k --format aoti \
        --weights-format as-shipped --out /tmp/fs8k 2>&1 | grep --line-buffered -v "UserWarning\|warnings.warn" | tee "$OUT/build_flash_slice_8k.log"
      rm -rf /tmp/fs8k ;;
    test-as-shipped)  # the as-shipped decode engine at B 1, 3 and 64 (export narrowing, session 23)
      $PYTEST tests/dsv4_compile/test_generate_gpu.py -k as_shipped 2>&1 | tee "$OUT/test_as_shipped.log" | tail -5 ;;
    tests-export)     # compile / export / generate on the GPU
      $PYTEST -m gpu -n 3 --dist loadgroup tests/dsv4_compile/test_compile_gpu.py tests/dsv4_compile/test_export_gpu.py \
        tests/dsv4_compile/test_generate_gpu.py 2>&1 | tee "$OUT/tests_export.log" | tail -30 ;;
    tests-kernels)    # every kernel, model, runtime and optimizer GPU test (loadgroup: the tens-of-GiB ones on one worker)
      $PYTEST -m gpu -n 4 --dist loadgroup tests/kernels tests/model tests/dsv4_compile/test_runtime.py tests/dsv4_compile/test_optim.py \
        2>&1 | tee "$OUT/tests_kernels.log" | tail -30 ;;
    indexer-cached)   # decode's indexer over the packed key cache vs unpack + indexer_topk
      $PYTEST tests/kernels/test_indexer_topk_cached.py tests/kernels/test_indexer_topk.py \
        tests/kernels/test_indexer_topk_fp8.py tests/kernels/test_indexer_topk_radix.py 2>&1 | tail -5
      python3 bench/bench_attention.py --contexts 32k,128k --no-prefill --no-decode --indexer-batches 1,64 \
        --budget 400 --out "$OUT" 2>&1 | tail -30 ;;
    decode-attention) # FP8-cache decode attention (issue 17): bench_attention's DECODE_CONFIGS (or DECODE_CONFIGS,
      # ';'-separated); the indexer rows are indexer-cached's
      $PYTEST -m gpu tests/kernels/test_sparse_attention_cached.py tests/kernels/test_sparse_attention.py -n 4 2>&1 | tail -5
      python3 bench/bench_attention.py --contexts 8k,32k,128k --no-prefill --indexer-batches "" --out "$OUT" \
        ${DECODE_CONFIGS:+--decode-configs "$DECODE_CONFIGS"} 2>&1 | tail -30 ;;
    ncu-decode-attention) # issue 17: what bounds decode attention: ncu of one launch per config (NCU_CONFIGS,
      # ';'-separated) beside the configs' CUDA-graph times of the same run; details + a summary of the SASS lines
      cfgs=${NCU_CONFIGS:-";block_k=32,num_stages=1,num_splits=2;block_k=64,num_splits=4,dequant=chunks"}
      python3 bench/profile_decode_attention.py --configs "$cfgs" 2>&1 | tee "$OUT/ncu_decode_attention.txt"
      ncu_each_config ncu_decode_attention '_sparse_attn_(fwd|fp8_chunks)_kernel' 1 "$cfgs" bench/profile_decode_attention.py
      grep -E "config|Duration|Throughput|Registers|Achieved Occupancy|Warp Cycles Per Issued|Local" "$OUT/ncu_decode_attention.txt" ;;
    ncu-moe-decode)   # issues 15/16: what bounds the routed experts' decode kernels: ncu of one gate/up + down launch per
      # config (NCU_CONFIGS, ';'-separated; FORMAT mxfp4 | fp8 | bf16; TOKENS) beside their CUDA-graph times
      cfgs=${NCU_CONFIGS:-""}; moe_args=(--tokens "${TOKENS:-64}" --format "${FORMAT:-mxfp4}")
      python3 bench/profile_moe_decode.py "${moe_args[@]}" --configs "$cfgs" 2>&1 | tee "$OUT/ncu_moe_decode.txt"
      ncu_each_config ncu_moe_decode '_(gate_up|down)_kernel' 2 "$cfgs" bench/profile_moe_decode.py "${moe_args[@]}"
      grep -E "config|_kernel|Duration|Throughput|Registers|Achieved Occupancy|Warp Cycles Per Issued|Local" "$OUT/ncu_moe_decode.txt" ;;
    tests-attention)  # both attention ops' GPU tests and the engines' symbolic sizes (decode attention's run-time splits)
      $PYTEST -m gpu -n 4 tests/kernels/test_sparse_attention_cached.py tests/kernels/test_sparse_attention.py \
        tests/kernels/test_symbolic_sizes.py 2>&1 | tee "$OUT/tests_attention.log" | tail -8 ;;
    hc-decode)        # a decode step's hc_pre: split counts, and 1 Sinkhorn round vs 20 (what the rounds cost)
      BENCH_OUT="$OUT" python3 bench/bench_hc.py --decode 2>&1 | tail -24 ;;
    tests-hc)         # the mHC kernels' GPU tests, then a decode step's hc_pre per config (HC_CONFIGS ';'-separated, ''
      # the decode default) at B 1 and 64: CUDA-graph us per call and the outputs' sums (bit-exact across configs)
      $PYTEST -m gpu tests/kernels/test_hc_sinkhorn.py 2>&1 | tee "$OUT/tests_hc.log" | tail -4
      python3 bench/profile_hc_decode.py --batch 1,64 --configs "${HC_CONFIGS:-}" 2>&1 | tee "$OUT/hc_decode_configs.txt" ;;
    ncu-hc-decode)    # issue 16: what bounds a decode step's hc_pre (BATCH, NCU_CONFIGS ';'-separated, '' the decode
      # default): ncu of one launch of each config's kernels beside their CUDA-graph times
      cfgs=${NCU_CONFIGS:-""}; hc_args=(--batch "${BATCH:-1}")
      python3 bench/profile_hc_decode.py "${hc_args[@]}" --configs "$cfgs" 2>&1 | tee "$OUT/ncu_hc_decode.txt"
      ncu_each_config ncu_hc_decode '_hc_' 2 "$cfgs" bench/profile_hc_decode.py "${hc_args[@]}"
      grep -E "config|_kernel|Duration|Throughput|Registers|Achieved Occupancy|Warp Cycles Per Issued|Local" "$OUT/ncu_hc_decode.txt" ;;
    decode-step)      # issue 16's decode roofline, flash-slice (CONTEXTS, BATCHES, WEIGHTS=as-shipped, BUDGET override;
      # ENGINE_MAX_BATCH: the AOTI engine's bound, e.g. B 1 on a 64-sequence engine, the compiled rows skipped;
      # ENGINE_CONFIGS: AOTI engines side by side, ';'-separated Inductor options, e.g. ";combo_kernels=True")
      python3 bench/bench_decode_step.py --config flash-slice --contexts "${CONTEXTS:-8k,32k}" \
        --batches "${BATCHES:-64,8,1}" --weights "${WEIGHTS:-bf16}" --aoti --profile --budget "${BUDGET:-500}" \
        ${ENGINE_MAX_BATCH:+--engine-max-batch "$ENGINE_MAX_BATCH" --no-compile} \
        ${ENGINE_CONFIGS:+--engine-inductor-configs "$ENGINE_CONFIGS"} --out "$OUT" 2>&1 | tee "$OUT/decode_step.log" \
        | grep -v "Warning\|warn\|return cls" | tail -40 ;;   # the log comes back from a call cut short
    tests-moe)        # the MoE kernel's tests compiled (every one of tests/kernels/test_moe_experts.py) and the plain ops'
      # (one process took ~10 minutes, mostly compiling: 4 workers)
      $PYTEST -n 4 --dist loadgroup tests/kernels/test_moe_experts.py tests/model/test_ops_moe.py 2>&1 | tee "$OUT/tests_moe.log" | tail -8 ;;
    moe)              python3 bench/bench_moe.py --out "$OUT" 2>&1 | tail -30 ;;   # its "fp8 w8a8 / bf16", "mxfp4 w4a8 / bf16" columns: issue 15
    moe-decode)       # decode sizes only (about a minute): the W4A8 routes, float32 scales vs e8m0, and 32-wide
      # column tiles (the H100's decode default; bench/results/H200/moe_decode_tiles_offline.md) vs the default
      python3 bench/bench_moe.py --tokens 1,8,64 --decode-configs "${DECODE_CONFIGS:-block_n=32,down_block_n=32}" \
        --out "$OUT" 2>&1 | tail -3; head -14 "$OUT/moe.md" | tail -7; grep -A16 "^Decode configs" "$OUT/moe.md" ;;
    moe-decode-configs) # the routed experts at decode sizes per config (MOE_CONFIGS ';'-separated, '' the op's default;
      # TOKENS, FORMAT, ACT: the as-shipped engines' W4A8 by default): CUDA-graph us and the output's sums
      python3 bench/profile_moe_decode.py --tokens "${TOKENS:-1,8,64}" --format "${FORMAT:-mxfp4}" --act "${ACT:-fp8}" \
        --configs "${MOE_CONFIGS:-}" 2>&1 | tee "$OUT/moe_decode_configs.txt" ;;
    tests-moe-split)  # the split-K decode path's tests compiled (every format, T 1 and 7, the symbolic T export)
      $PYTEST -n 4 tests/kernels/test_moe_experts.py -k "split" 2>&1 | tee "$OUT/tests_moe_split.log" | tail -6 ;;
    tests-fp8)        # the FP8 linear's GPU tests (every route: cuBLAS, the swapped tile, the GEMV defaults) and its
      # substitution's (the engine's row tiers)
      $PYTEST -m gpu tests/kernels/test_fp8_linear.py tests/kernels/test_substitution_fp8_linear.py 2>&1 \
        | tee "$OUT/tests_fp8.log" | tail -6 ;;
    fp8-linear-configs) # FP8 linears at few rows per config (FP8_CONFIGS ';'-separated, over the default for the rows;
      # TOKENS, SHAPES: bench_fp8_linear's names) beside bf16 and torch._scaled_mm: fp8_linear.md / _sweep.csv
      BENCH_OUT="$OUT" python3 bench/bench_fp8_linear.py --tokens "${TOKENS:-1,64}" --shapes "${SHAPES:-}" \
        --configs "${FP8_CONFIGS:?fp8-linear-configs: set FP8_CONFIGS}" 2>&1 | grep -v "^  " | tail -20 ;;
    float32-linear)   # the float32 projections' kernel (compressors, issue 16): its GPU tests, then the bench against
      # cuBLAS's float32 GEMM (TOKENS; F32_CONFIGS ';'-separated over the default, timed too): float32_linear.md / .png
      $PYTEST -n 4 tests/kernels/test_float32_linear.py 2>&1 | tee "$OUT/tests_float32_linear.log" | tail -4
      BENCH_OUT="$OUT" python3 bench/bench_float32_linear.py --tokens "${TOKENS:-1,64,4096,16384}" \
        --configs "${F32_CONFIGS:-}" 2>&1 | grep -v "^  " | tail -16 ;;
    moe-w8a8)         # issue 15: the moe_experts_fp8_w8a8 op's kernel compiled: the odd shapes and the substitution, and at
      # T 4096 vs its naive twin, the plain W8A8 op and the W8A16 kernel (prints their distances)
      $PYTEST -s tests/kernels/test_moe_experts.py -k "w8a8 or substitution" 2>&1 | tee "$OUT/tests_moe_w8a8.log" | tail -8 ;;
    moe-w4a8)         # issue 15: the moe_experts_mxfp4_w4a8 op's kernel compiled (bf16 and FP8 tensor-core routes, the
      # activation rounded in the epilogue or by a pass): the odd shapes, the fold limit and the substitution, and
      # at T 4096 vs its naive twin, the plain W4A8 op and the W4A16 kernel (prints their distances); its
      # timings: the moe step's "mxfp4 w4a8 / bf16" and "w4a8 epilogue / ours" columns
      $PYTEST -s tests/kernels/test_moe_experts.py -k "w4a8" 2>&1 | tee "$OUT/tests_moe_w4a8.log" | tail -8 ;;
    tune-moe|tune)    # table entries, copied into $OUT/tables/<GPU>.yaml (copy it back to commit it). tune-moe: issue 15's
      # grouped-expert kernels (bf16, W8A8 and W4A8, the releases' MXFP4 experts as run) at prefill sizes and decode
      # batch 64; tune: the kernels in KERNELS (e.g. sparse_attention_cached at CONTEXTS=8k,32k,128k)
      kernels=$KERNELS; [ "$step" = tune-moe ] && kernels=${KERNELS:-moe_experts,moe_experts_fp8_w8a8,moe_experts_mxfp4_w4a8}
      cp -r tuning/tables "$OUT/tables"
      python3 -m dsv4_compile tune --gpu "$GPU" --kernels "${kernels:?tune: set KERNELS}" \
        --context "${CONTEXTS:-4k,32k}" --trials "${TRIALS:-20}" --timeout "${TUNE_S:-420}" --tables-dir "$OUT/tables" \
        --storage "sqlite:///$OUT/studies.db" --no-progress 2>&1 | tee "$OUT/$step.log" | tail -40
      # what comes back is at most 8 files: this GPU's table, the log, the studies and 3 of the sweep plots
      mkdir -p "$OUT/png"; mv "$OUT/tables/$GPU"/*.png "$OUT/png/" 2>/dev/null
      ls "$OUT/png" | tail -n +4 | sed "s|^|$OUT/png/|" | xargs rm -f
      find "$OUT/tables" -mindepth 1 ! -name "$GPU.yaml" -exec rm -rf {} + ;;
    probe-sinkhorn)   # whether this torch's AOTInductor and torch.onnx take the Sinkhorn rounds as one while_loop
      python3 bench/probe_sinkhorn_loop.py 2>&1 | grep -E "^(torch|unrolled|while_loop)" ;;
    muon)             # issue 17's Muon targets, then where a Newton-Schulz step goes (the symmetric products' % of peak)
      python3 bench/bench_newton_schulz.py 2>&1 | tail -30; cp bench/results/"$GPU"/newton_schulz* "$OUT"/ 2>/dev/null
      BENCH_OUT="$OUT" python3 bench/profile_newton_schulz.py 2>&1 | tail -60 ;;
    layers)           python3 bench/bench_layers.py --contexts "${CONTEXTS:-32k,128k}" --out "$OUT" 2>&1 | tail -30 ;;
    ab)               # a change measured against its absence in one call: AB_CMD (a bench command writing its
      # results under $AB_OUT) run on a copy of this tree with the files under AB_BEFORE laid over it (the
      # changed files as they were, e.g. `git show HEAD:F` into an ignored folder brought by `carry`), then on
      # this tree; the .md files it wrote come back under $OUT/before and $OUT/after
      rm -rf /tmp/ab-before /tmp/ab-site && cp -r . /tmp/ab-before && cp -r "$AB_BEFORE"/. /tmp/ab-before/ || exit 1
      python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
        --target /tmp/ab-site /tmp/ab-before >/dev/null || exit 1
      for side in before after; do
        rm -rf /tmp/ab-out && mkdir -p /tmp/ab-out "$OUT/$side"
        if [ $side = before ]; then
          (cd /tmp/ab-before && PYTHONPATH=/tmp/ab-site:/tmp/site:/tmp/ab-before AB_OUT=/tmp/ab-out bash -c "$AB_CMD")
        else
          AB_OUT=/tmp/ab-out bash -c "$AB_CMD"
        fi
        find /tmp/ab-out -name '*.md' -exec cp {} "$OUT/$side/" \;
      done ;;
    *) echo "unknown step $step; steps: build-mini build-flash-slice tests-export tests-kernels indexer-cached" \
            "decode-attention ncu-decode-attention ncu-moe-decode test-as-shipped tests-attention tests-hc hc-decode ncu-hc-decode" \
            "decode-step moe moe-decode moe-decode-configs tests-moe-split tests-fp8 fp8-linear-configs float32-linear moe-w8a8" \
            "moe-w4a8 tune-moe tune probe-sinkhorn muon layers tests-moe ab"; exit 2 ;;
  esac
done
echo "== done $(date -u +%H:%M:%S)"
