"""Plan a GLaM run before building it: `glam-plan` (or `python -m keras_glam.plan`).

Per-device memory and traffic on a mesh (`keras_glam.distribution.plan`), and with `--tokens`
the run's bill: training FLOPs, petaflop/s-days, chip-hours and energy at an assumed `--mfu`, or
the MFU that a reported `--energy-mwh` or `--hours` implies; then Chinchilla's compute-optimal
size for the same FLOPs. `--flop-budget` alone prints the compute-optimal size. GLaM's own row:

    glam-plan glam_64b_64e --mesh data=2,expert=64,model=8 --batch-tokens 1048576 --fsdp \\
        --remat --device-memory-gib 32 --tokens 600e9 --chip tpu_v4 --watts 326 --pue 1.11 \\
        --energy-mwh 456

Like `glam-train`, it imports nothing heavy until the arguments are parsed, hides the libraries'
start-up logs, and reports a problem the user can fix in one line on stderr, with exit code 2.
"""

import argparse
import sys

from keras_glam.cli_support import native_stderr_hidden
from keras_glam.cli_support import quiet_library_logs
from keras_glam.cli_support import report_user_error


def _count(text):
    """A positive whole number, also written `600e9`."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(value)


def _positive(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="glam-plan",
        description=(
            "Per-device memory and traffic of a GLaM preset on a mesh; with --tokens, the "
            "run's FLOPs, chip-hours, energy and MFU, and Chinchilla's compute-optimal size."
        ),
    )
    parser.add_argument("preset", nargs="?", help="builtin preset name, e.g. glam_64b_64e")
    step = parser.add_argument_group("one training step")
    step.add_argument(
        "--mesh", default="", help="axis=size pairs over data, expert, model (default: 1 device)"
    )
    step.add_argument(
        "--batch-tokens", type=_count,
        help="tokens per global batch (default: one sequence per batch shard)",
    )
    step.add_argument("--sequence-length", type=_count, default=1024, help="default: 1024")
    step.add_argument("--fsdp", action="store_true", help="split dense weights over 'expert'")
    step.add_argument("--remat", action="store_true", help="per-layer rematerialisation")
    step.add_argument("--dtype", default="mixed_bfloat16", help="Keras dtype policy")
    step.add_argument("--device-memory-gib", type=_positive, help="memory of one device")
    run = parser.add_argument_group("the whole run (the bill)")
    run.add_argument("--tokens", type=_count, help="training tokens, e.g. 600e9")
    run.add_argument(
        "--chip",
        help="a chip of the peak table: tpu_v4, tpu_v5e, tpu_v5p, tpu_v6e, a100, h100, ... (an "
        "unknown name lists them), or any label with --peak-tflops",
    )
    run.add_argument("--peak-tflops", type=_positive, help="peak TFLOP/s per chip (overrides)")
    run.add_argument("--watts", type=_positive, help="watts per chip, for the energy")
    run.add_argument("--pue", type=_positive, default=1.0, help="data centre PUE (default: 1)")
    implied = run.add_mutually_exclusive_group()
    implied.add_argument("--mfu", type=_positive, help="assumed MFU, e.g. 0.4")
    implied.add_argument("--energy-mwh", type=_positive, help="reported energy: implies MFU")
    implied.add_argument("--hours", type=_positive, help="reported wall-clock: implies MFU")
    parser.add_argument(
        "--flop-budget", type=_positive,
        help="print Chinchilla's compute-optimal size for this many training FLOPs",
    )
    return parser, parser.parse_args(argv)


def report(args):
    """The text `glam-plan` prints for parsed `args`. Raises `ValueError` on bad input."""
    from keras_glam.distribution import Hardware
    from keras_glam.distribution import compute_optimal_size
    from keras_glam.distribution import num_batch_shards
    from keras_glam.distribution import parse_mesh_spec
    from keras_glam.distribution import plan

    sections = []
    if args.flop_budget is not None:
        sections.append(str(compute_optimal_size(args.flop_budget)))
    if args.preset is None:
        if not sections:
            raise ValueError("Name a preset (e.g. glam_64b_64e), or give --flop-budget.")
        return "\n".join(sections)
    mesh = parse_mesh_spec(args.mesh) if args.mesh else {}
    hardware = None
    if args.chip or args.peak_tflops:
        hardware = Hardware(
            args.chip or "custom chip",
            peak_flops_per_chip=args.peak_tflops and args.peak_tflops * 1e12,
            watts_per_chip=args.watts,
            pue=args.pue,
        )
    elif args.watts or args.mfu or args.energy_mwh or args.hours:
        raise ValueError("--watts, --mfu, --energy-mwh and --hours need --chip or --peak-tflops.")
    batch_shards = num_batch_shards(mesh)
    sections.insert(
        0,
        str(
            plan(
                args.preset,
                mesh,
                batch_tokens=args.batch_tokens or args.sequence_length * batch_shards,
                sequence_length=args.sequence_length,
                fsdp=args.fsdp,
                remat=args.remat,
                dtype=args.dtype,
                device_memory_gib=args.device_memory_gib,
                training_tokens=args.tokens,
                hardware=hardware,
                mfu=args.mfu,
                energy_mwh=args.energy_mwh,
                training_hours=args.hours,
            )
        ),
    )
    return "\n".join(sections)


def main(argv=None):
    """Console entry point (`glam-plan`, `python -m keras_glam.plan`).

    Returns:
        The exit code: 0, or 2 for a problem the user can fix (one line on stderr).
    """
    _, args = parse_args(argv)
    quiet_library_logs()
    try:
        with native_stderr_hidden():
            # Imported here, after the arguments and the log levels: `--help` needs none of it.
            import keras_glam.distribution  # noqa: F401
        print(report(args))
    except Exception as error:
        return report_user_error("glam-plan", error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
