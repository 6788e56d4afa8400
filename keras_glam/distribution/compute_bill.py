"""What a training run costs: FLOPs, petaflop/s-days, chip-hours, energy; and the MFU a reported
energy or duration implies. Also Chinchilla's compute-optimal model size for a FLOP budget.

The arithmetic (`docs/compute.md` works GLaM's row through it):

    total FLOPs   = training FLOPs per token (3 x forward, `flops_per_token`) x tokens
    chip-seconds  = total FLOPs / (peak FLOP/s per chip x MFU)
    energy        = chip-hours x watts per chip x PUE

and backwards: chip-hours from a reported energy (or hours x chips), then
MFU = total FLOPs / (chip-seconds x peak).
"""

import dataclasses
import math

from keras_glam.models import presets
from keras_glam.models.architecture import resolve_config
from keras_glam.models.flops import flops_per_token
from keras_glam.models.flops import training_flops_per_token
from keras_glam.models.parameter_count import count_params
from keras_glam.training.compute_meter import ACCELERATOR_PEAK_FLOPS
from keras_glam.training.compute_meter import peak_flops_per_chip

PETAFLOP_S_DAY = 1e15 * 24 * 3600
CHINCHILLA_TOKENS_PER_PARAMETER = 20
CHINCHILLA_SOURCE = (
    "Hoffmann et al. 2022, 'Training Compute-Optimal Large Language Models' (Chinchilla): "
    "about 20 tokens per parameter, C = 6 N D"
)


@dataclasses.dataclass(frozen=True)
class Hardware:
    """The chips a run trains on and the data centre around them.

    Attributes:
        chip: a name of `keras_glam.training.compute_meter.ACCELERATOR_PEAK_FLOPS`
            (`"tpu_v4"`), a JAX device kind, or any label when `peak_flops_per_chip` is given.
        peak_flops_per_chip: dense bfloat16 peak FLOP/s of one chip; None: from the table.
        watts_per_chip: average power of one chip (with its share of the host), measured or
            assumed; None leaves energy out of the bill.
        pue: the data centre's power usage effectiveness (facility energy / IT energy).
    """

    chip: str
    peak_flops_per_chip: float = None
    watts_per_chip: float = None
    pue: float = 1.0

    def __post_init__(self):
        if self.peak_flops_per_chip is None:
            peak = peak_flops_per_chip(self.chip)
            if peak is None:
                raise ValueError(
                    f"No peak FLOP/s known for chip '{self.chip}'. Give its peak "
                    "(peak_flops_per_chip=, glam-plan --peak-tflops) or name one of: "
                    f"{', '.join(ACCELERATOR_PEAK_FLOPS)}."
                )
            object.__setattr__(self, "peak_flops_per_chip", peak)
        for name in ("peak_flops_per_chip", "watts_per_chip", "pue"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"Hardware `{name}` must be positive, got {value!r}.")


# GLaM's training hardware: TPU v4 at the 326 W per chip the paper measured, in a data centre of
# PUE 1.11, the value that reconciles the paper's two energy figures with its chip-hours
# (1,024 chips x 574 h x 326 W x 1.11 = 212.7 MWh, reported 213 MWh for 280B tokens).
GLAM_TPU_V4 = Hardware("tpu_v4", watts_per_chip=326.0, pue=1.11)


@dataclasses.dataclass(frozen=True)
class ComputeOptimalSize:
    """Chinchilla's compute-optimal dense model for a FLOP budget (`CHINCHILLA_SOURCE`).

    Attributes:
        flops: the training FLOP budget C.
        parameters: N = sqrt(C / (6 r)) for r tokens per parameter.
        tokens: D = r N.
        nearest_preset: the builtin dense preset whose parameter count is nearest to N (by
            ratio). The rule sizes dense models; a MoE preset of the same width costs about as
            much per token while holding many more parameters.
        nearest_preset_params: its parameters.
    """

    flops: float
    parameters: float
    tokens: float
    nearest_preset: str
    nearest_preset_params: int

    def __str__(self):
        return "\n".join(
            [
                f"  compute-optimal size for {self.flops:.3g} FLOPs (Chinchilla):",
                f"    a dense model of {_count(self.parameters)} parameters on "
                f"{_count(self.tokens)} tokens; nearest dense GLaM preset "
                f"{self.nearest_preset} ({_count(self.nearest_preset_params)})",
                f"    rule: {CHINCHILLA_SOURCE}",
            ]
        )


def compute_optimal_size(flops, tokens_per_parameter=CHINCHILLA_TOKENS_PER_PARAMETER):
    """The dense model size and token count Chinchilla's rule gives a training FLOP budget.

    Args:
        flops: training FLOPs to spend, C.
        tokens_per_parameter: r, tokens per parameter at the optimum (Hoffmann et al.: ~20).

    Returns:
        A `ComputeOptimalSize` (`print` it for the line with the rule's source).

    Example:

    >>> size = compute_optimal_size(5.76e23)    # Chinchilla's own budget
    >>> round(size.parameters / 1e9), round(size.tokens / 1e12, 2)
    (69, 1.39)
    """
    if not flops > 0 or not tokens_per_parameter > 0:
        raise ValueError(
            f"`flops` and `tokens_per_parameter` must be positive, got {flops!r} and "
            f"{tokens_per_parameter!r}."
        )
    parameters = math.sqrt(flops / (6 * tokens_per_parameter))
    dense = {
        name: metadata["params"]
        for name, metadata in presets.builtin_presets().items()
        if metadata["params"] == metadata["activated_params"]
    }
    nearest = min(dense, key=lambda name: abs(math.log(dense[name] / parameters)))
    return ComputeOptimalSize(
        flops=flops,
        parameters=parameters,
        tokens=tokens_per_parameter * parameters,
        nearest_preset=nearest,
        nearest_preset_params=dense[nearest],
    )


@dataclasses.dataclass(frozen=True)
class TrainingBill:
    """The cost of training a model on a number of tokens.

    Attributes:
        model: the preset name, or `"custom config"`.
        tokens: training tokens.
        sequence_length: tokens per row (the attention scores depend on it).
        flops_per_token: forward FLOPs per token (`flops_per_token`).
        training_flops_per_token: 3 x forward.
        six_n_flops_per_token: `6 * activated_params`, the common approximation, for comparison.
        total_flops: `training_flops_per_token * tokens`.
        hardware: a `Hardware`, or None (FLOPs only).
        mfu: model FLOPs utilisation, assumed or implied; None without hardware.
        mfu_source: `"assumed"`, or what implied it.
        chip_hours: chips x hours at that MFU; None without hardware.
        energy_mwh: chip-hours x watts x PUE; None without watts.
        num_chips: chips of the run, for the wall-clock time; or None.
    """

    model: str
    tokens: float
    sequence_length: int
    flops_per_token: int
    training_flops_per_token: int
    six_n_flops_per_token: int
    total_flops: float
    hardware: Hardware = None
    mfu: float = None
    mfu_source: str = None
    chip_hours: float = None
    energy_mwh: float = None
    num_chips: int = None

    @property
    def petaflop_s_days(self):
        return self.total_flops / PETAFLOP_S_DAY

    @property
    def wall_hours(self):
        """Hours on `num_chips` chips, or None."""
        if self.chip_hours is None or not self.num_chips:
            return None
        return self.chip_hours / self.num_chips

    def __str__(self):
        lines = [
            f"  training bill: {_count(self.tokens)} tokens, rows of {self.sequence_length}",
            _row(
                "training FLOPs per token",
                f"{_si(self.training_flops_per_token)}FLOP = 3 x forward "
                f"{_si(self.flops_per_token)}FLOP "
                f"(6 x activated params: {_si(self.six_n_flops_per_token)}FLOP)",
            ),
            _row(
                "total training FLOPs",
                f"{self.total_flops:.4g} = {_amount(self.petaflop_s_days)} petaflop/s-days",
            ),
        ]
        if self.hardware is not None:
            hardware = self.hardware
            lines.append(
                _row(
                    f"chip-hours at MFU {self.mfu:.1%} ({self.mfu_source})",
                    f"{_amount(self.chip_hours)} on {hardware.chip} "
                    f"({_si(hardware.peak_flops_per_chip)}FLOP/s peak)",
                )
            )
            if self.wall_hours is not None:
                lines.append(
                    _row(
                        f"wall-clock on {self.num_chips:,} chip(s)",
                        f"{_amount(self.wall_hours)} h = {_amount(self.wall_hours / 24)} days",
                    )
                )
            if self.energy_mwh is not None:
                lines.append(
                    _row(
                        "energy",
                        f"{_amount(self.energy_mwh)} MWh ({hardware.watts_per_chip:g} W per "
                        f"chip, PUE {hardware.pue:g})",
                    )
                )
        return "\n".join(lines)


def _row(label, text):
    return f"    {label:<48}{text}"


def _amount(value):
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _si(value):
    """`575.1 G`: SI prefixes, for FLOPs."""
    for prefix, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if value >= scale:
            return f"{value / scale:,.1f} {prefix}"
    return f"{value:,.0f} "


def _count(value):
    """`53.6B`: tokens and parameters, the way papers write them."""
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:,.3g}{suffix}"
    return f"{value:,.0f}"


def training_bill(
    preset_or_config,
    tokens,
    hardware=None,
    mfu=None,
    energy_mwh=None,
    chip_hours=None,
    hours=None,
    num_chips=None,
    sequence_length=1024,
):
    """The FLOPs, petaflop/s-days, chip-hours and energy of training on `tokens` tokens.

    With `hardware`, give exactly one of: `mfu` (assumed, or measured by
    `keras_glam.training.ComputeMeter`), or a reported `energy_mwh`, `chip_hours` or `hours`
    (wall-clock, with `num_chips`), from which the MFU is implied (`implied_mfu`).

    Args:
        preset_or_config: a preset name or a `GLaMBackbone` config dict.
        tokens: training tokens (GLaM 64B/64E: 600e9).
        hardware: a `Hardware`, or None for the FLOPs alone.
        mfu: model FLOPs utilisation in (0, 1].
        energy_mwh: reported energy of the run, facility included (PUE).
        chip_hours: reported chip-hours.
        hours: reported wall-clock hours on `num_chips` chips.
        num_chips: chips of the run (for the wall-clock time, or with `hours`).
        sequence_length: tokens per row.

    Returns:
        A `TrainingBill`; `print` it for the report lines.

    Example:
    ```python
    bill = training_bill("glam_64b_64e", 600e9, GLAM_TPU_V4, energy_mwh=456, num_chips=1024)
    bill.mfu            # 0.277: what GLaM's reported energy implies on TPU v4
    ```
    """
    name, config = resolve_config(preset_or_config)
    if not tokens > 0:
        raise ValueError(f"`tokens` must be positive, got {tokens!r}.")
    forward = flops_per_token(config, sequence_length)
    training = training_flops_per_token(config, sequence_length)
    bill = dict(
        model=name,
        tokens=tokens,
        sequence_length=sequence_length,
        flops_per_token=forward,
        training_flops_per_token=training,
        six_n_flops_per_token=6 * count_params(config)[1],
        total_flops=training * tokens,
        num_chips=num_chips,
    )
    reported = {"energy_mwh": energy_mwh, "chip_hours": chip_hours, "hours": hours}
    given = [key for key, value in {"mfu": mfu, **reported}.items() if value is not None]
    if hardware is None:
        if given:
            raise ValueError(
                f"{', '.join(given)} need the hardware: pass hardware=Hardware('tpu_v4', ...)."
            )
        return TrainingBill(**bill)
    if len(given) != 1:
        raise ValueError(
            "Give exactly one of mfu= (assumed) or energy_mwh=, chip_hours=, hours= (reported, "
            f"to imply the MFU); got {', '.join(given) or 'none'}."
        )
    if mfu is None:
        used_hours = _reported_chip_hours(hardware, num_chips=num_chips, **reported)
        mfu = bill["total_flops"] / (used_hours * 3600 * hardware.peak_flops_per_chip)
        key = given[0]
        mfu_source = f"implied by {reported[key]:,g} {_UNITS[key]}"
    elif not 0 < mfu <= 1:
        raise ValueError(f"`mfu` must be in (0, 1], got {mfu!r}.")
    else:
        mfu_source = "assumed"
    used_hours = bill["total_flops"] / (mfu * hardware.peak_flops_per_chip) / 3600
    return TrainingBill(
        **bill,
        hardware=hardware,
        mfu=mfu,
        mfu_source=mfu_source,
        chip_hours=used_hours,
        energy_mwh=(
            None
            if hardware.watts_per_chip is None
            else used_hours * hardware.watts_per_chip * hardware.pue / 1e6
        ),
    )


_UNITS = {"energy_mwh": "MWh", "chip_hours": "chip-hours", "hours": "hours"}


def _reported_chip_hours(hardware, energy_mwh=None, chip_hours=None, hours=None, num_chips=None):
    if energy_mwh is not None:
        if hardware.watts_per_chip is None:
            raise ValueError(
                "An energy implies chip-hours only with the power: give the Hardware "
                "watts_per_chip (and pue)."
            )
        return energy_mwh * 1e6 / (hardware.watts_per_chip * hardware.pue)
    if hours is not None:
        if not num_chips:
            raise ValueError("`hours` is wall-clock time: give num_chips too.")
        return hours * num_chips
    return chip_hours


def implied_mfu(preset_or_config, tokens, hardware, sequence_length=1024, **reported):
    """The MFU that a reported energy (`energy_mwh=`), `chip_hours=` or `hours=` (with
    `num_chips=`) implies for training on `tokens` tokens; see `training_bill`.

    Example:
    ```python
    implied_mfu("glam_64b_64e", 600e9, GLAM_TPU_V4, energy_mwh=456)   # 0.277
    ```
    """
    return training_bill(
        preset_or_config, tokens, hardware, sequence_length=sequence_length, **reported
    ).mfu
