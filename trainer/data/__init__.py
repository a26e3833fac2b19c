"""Recordings: reading and checking the published h5 layout, history windows, splits, synthetic recordings."""

from trainer.data.recording import (
    DATA_ROOT_ENV,
    DEFAULT_DATA_ROOT,
    DataBundle,
    WindowSet,
    check_recording,
    format_summary,
    load_data,
    recording_path,
    resolve_data_root,
)
from trainer.data.synth import describe_synthetic, write_synthetic

__all__ = [
    "DATA_ROOT_ENV",
    "DEFAULT_DATA_ROOT",
    "DataBundle",
    "WindowSet",
    "check_recording",
    "describe_synthetic",
    "format_summary",
    "load_data",
    "recording_path",
    "resolve_data_root",
    "write_synthetic",
]
