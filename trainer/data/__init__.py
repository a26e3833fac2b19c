"""Recordings: reading and checking the published h5 layout (`recording`), history windows, splits, which cells
`cells: "all"` means (`cells`), synthetic recordings (`synth`). Import the submodules: this package imports nothing
itself, so that `retina-trainer data --help` starts without torch."""
