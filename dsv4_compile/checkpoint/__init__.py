"""Released DeepSeek-V4 checkpoints: read (`from_pretrained`), describe (`inspect`) and write
(`write_checkpoint`, synthetic checkpoints in the shipped formats). Names: names.py; files: files.py."""
from .files import CheckpointError
from .load import CheckpointInfo, check_checkpoint, from_pretrained
from .write import write_checkpoint

__all__ = ["CheckpointError", "CheckpointInfo", "check_checkpoint", "from_pretrained", "write_checkpoint"]
