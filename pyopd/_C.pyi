"""Type stub of the pyopd._C extension (framework-free kernels; see csrc/bindings.cpp).

Pointer fields are integer addresses (tensor.data_ptr()); 0 means null. device < 0 is
the CPU, else a CUDA ordinal; stream is a cudaStream_t as an integer."""
from __future__ import annotations

from enum import IntEnum

class DType(IntEnum):
    float32 = 0
    bfloat16 = 1
    float16 = 2
    float64 = 3

class VocabStatsInputs:
    """The inputs of both passes (base of the forward and backward params)."""

    student: int
    student_dtype: DType
    student_row_stride: int
    teacher: int
    teacher_dtype: DType
    teacher_row_stride: int
    tokens: int
    mask: int
    n_rows: int
    vocab: int
    teacher_vocab: int
    inv_temperature: float

class VocabStatsFwdParams(VocabStatsInputs):
    def __init__(self) -> None: ...
    kl: int
    student_entropy: int
    teacher_entropy: int
    student_logprob: int
    teacher_logprob: int
    student_lse: int
    teacher_lse: int
    stats: int

class VocabStatsBwdParams(VocabStatsInputs):
    def __init__(self) -> None: ...
    stats: int
    kl: int
    student_entropy: int
    grad_kl: int
    grad_logprob: int
    grad_entropy: int
    grad_lse: int
    grad_student: int
    grad_dtype: DType

class TrajectoryStatsParams:
    def __init__(self) -> None: ...
    rows: int
    cols: int
    dtype: DType
    mask_row_stride: int
    teacher_logprob_row_stride: int
    kl_row_stride: int
    teacher_entropy_row_stride: int
    student_entropy_row_stride: int
    mask: int
    teacher_logprob: int
    kl: int
    teacher_entropy: int
    student_entropy: int
    length: int
    score: int
    mean_kl: int
    mean_teacher_entropy: int
    mean_student_entropy: int
    max_teacher_entropy: int
    max_student_entropy: int

class FireWeightsParams:
    def __init__(self) -> None: ...
    rows: int
    cols: int
    dtype: DType
    mask_row_stride: int
    teacher_entropy_row_stride: int
    student_entropy_row_stride: int
    alpha: float
    beta: float
    normalize_rows: bool
    mask: int
    teacher_entropy: int
    student_entropy: int
    keep: int
    teacher_entropy_max: int
    student_entropy_max: int
    weight: int
    row_sum: int
    row_count: int

class GroupAdvParams:
    def __init__(self) -> None: ...
    rows: int
    cols: int
    dtype: DType
    mask_row_stride: int
    teacher_logprob_row_stride: int
    student_logprob_row_stride: int
    clip_low: float
    clip_high: float
    bonus: float
    eps: float
    mask: int
    teacher_logprob: int
    student_logprob: int
    row_count: int
    row_mean: int
    row_m2: int
    group_mean: int
    group_std: int
    advantage: int

def build_info() -> dict: ...
def cuda_device_count() -> int: ...
def cuda_status() -> tuple[bool, str, int, int]:
    """(available, reason, driver_version, runtime_version); versions as 1000 * major + 10 * minor, 0 if none."""
    ...
def vocab_stats_fwd(params: VocabStatsFwdParams, device: int = -1, stream: int = 0) -> None: ...
def vocab_stats_bwd(params: VocabStatsBwdParams, device: int = -1, stream: int = 0) -> None: ...
def trajectory_stats(params: TrajectoryStatsParams, device: int = -1, stream: int = 0) -> None: ...
def fire_weights(params: FireWeightsParams, device: int = -1, stream: int = 0) -> None: ...
def group_reward_moments(params: GroupAdvParams, device: int = -1, stream: int = 0) -> None: ...
def group_advantages_apply(params: GroupAdvParams, device: int = -1, stream: int = 0) -> None: ...
