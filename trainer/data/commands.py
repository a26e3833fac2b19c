"""`retina-trainer data ...`: check a recording, or write a synthetic one."""

from pathlib import Path

import click

# trainer.data.summary and .synth import torch: they are imported inside the commands, so --help stays fast.


@click.group()
def data() -> None:
    """Check recordings and create synthetic ones.

    Recordings use the published h5 layout: <data root>/<dataset>/<stim_type>.h5 with groups train/ and test/,
    each holding stimulus (T, H, W), time (T,) and response/firing_rate_10ms (n_cells, T); test/repeats/cellNN
    (n_repeats, T) is optional.
    """


@data.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--history", type=click.IntRange(min=1), default=40, show_default=True,
              help="Frames per sample window (img_shape[0]); used to count samples.")
@click.option("--val-frac", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.1,
              show_default=True, help="Fraction of training samples held out at the end for validation.")
def check(file: Path, history: int, val_frac: float) -> None:
    """Validate FILE the way training would load it and print a summary.

    Reports cells, frames, durations, stimulus statistics, mean rates, test repeats and how many train,
    validation and test samples the given history and val_frac give. Exits non-zero with a one-line reason if
    the file is malformed or too short.
    """
    from trainer.data.summary import check_recording, format_summary

    click.echo(format_summary(check_recording(file, history=history, val_frac=val_frac)))


@data.command()
@click.argument("directory", metavar="DIR", type=click.Path(path_type=Path, file_okay=False))
@click.option("--dataset", default="synth01", show_default=True,
              help="Folder under DIR (like an experiment date).")
@click.option("--stim-type", default="whitenoise", show_default=True, help="File name without .h5.")
@click.option("--cells", "n_cells", type=int, default=5, show_default=True,
              help="Number of cells; they alternate between LN and subunit cells.")
@click.option("--size", type=int, default=20, show_default=True,
              help="Checkerboard size (size x size checkers).")
@click.option("--train-frames", type=int, default=20000, show_default=True,
              help="Training bins (10 ms each).")
@click.option("--test-frames", type=int, default=2000, show_default=True, help="Test bins (10 ms each).")
@click.option("--repeats", "n_repeats", type=int, default=5, show_default=True,
              help="Repeated trials of the test stimulus.")
@click.option("--history", type=int, default=40, show_default=True,
              help="Model history in bins; temporal filters are kept shorter than it.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same file.")
@click.option("--interneurons", "intr_frames", type=int, default=0, metavar="FRAMES",
              help="Also write DIR/<dataset>/interneurons/bipolars.h5: the membrane potentials of the generator's "
                   "subunits (its 'bipolar cells') on FRAMES bins of a separate boxes stimulus, in the original's "
                   "interneuron layout (for `retina-trainer analyze`).")
@click.option("--force", is_flag=True, help="Replace an existing file.")
def synth(directory: Path, dataset: str, stim_type: str, n_cells: int, size: int, train_frames: int,
          test_frames: int, n_repeats: int, history: int, seed: int, intr_frames: int, force: bool) -> None:
    """Write a synthetic recording from a known ground-truth retina.

    The file is DIR/<dataset>/<stim_type>.h5 in the published layout.

    The stimulus is binary white noise (frames held 3 bins of 10 ms); cells are LN or built from thresholded
    ON/OFF subunits; spikes are Poisson. The true rates are stored under ground_truth/ (ignored by training).
    The file is written to a temporary name and renamed when complete.
    """
    from trainer.data.synth import describe_synthetic, write_synthetic

    path = write_synthetic(directory, dataset, stim_type, n_cells=n_cells, size=size,
                           train_frames=train_frames, test_frames=test_frames, n_repeats=n_repeats,
                           history=history, seed=seed, overwrite=force, interneurons=intr_frames)
    click.echo(str(path))
    if intr_frames:
        from trainer.data.synth import INTERNEURON_FILE

        click.echo(str(path.parent / INTERNEURON_FILE))
    click.echo(describe_synthetic(path))
