"""What lives on disk: safe self-describing checkpoints, run folders and result tables."""
from .checkpoint import CheckpointError, atomic_write, load_model, load_state_dict_file, read_metadata, save_model
from .results import format_table, read_results, write_results
from .run_folder import RunFolder, load_or_create_model, preprocessing_config, read_accuracy, resolve_checkpoint

__all__ = ['CheckpointError', 'atomic_write', 'load_model', 'load_state_dict_file', 'read_metadata', 'save_model',
           'format_table', 'read_results', 'write_results', 'RunFolder', 'load_or_create_model',
           'preprocessing_config', 'read_accuracy', 'resolve_checkpoint']
