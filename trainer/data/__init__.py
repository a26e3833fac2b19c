"""Recordings: reading and checking a file in the published h5 layout and its splits (`recording`), the loaded samples
as history windows (`windows`), the `data check` summary (`summary`), which cells `cells: "all"` means (`cells`),
synthetic recordings (`synth`). Import the submodules: this package imports nothing itself, so that
`retina-trainer data --help` starts without torch."""
