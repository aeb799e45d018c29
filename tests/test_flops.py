"""FLOPs per image: counted from the built model, equal to the closed form and to TensorFlow's own."""
import pytest

from convmixer_dist.perf import flops
from convmixer_dist.model import build_convmixer
from convmixer_dist.presets import PRESETS


def test_convmixer_256_8_by_hand():
    # n = 32 / 2 = 16; stem 2*16²*2²*3*256; block: depthwise 2*16²*256*5² + pointwise 2*16²*256²; head 2*256*10.
    stem, depthwise, pointwise, head = 1_572_864, 3_276_800, 33_554_432, 5_120
    assert flops.convmixer_flops(**{k: v for k, v in PRESETS["convmixer_256_8"].items()
                                    if k != "activation"}) == stem + 8 * (depthwise + pointwise) + head
    assert stem + 8 * (depthwise + pointwise) + head == 296_227_840


@pytest.mark.parametrize("preset", ["convmixer_256_8", "convmixer_768_32"])
def test_model_flops_of_a_preset_equal_the_analytic_formula(preset):
    kwargs = {k: v for k, v in PRESETS[preset].items()}
    model = build_convmixer(**kwargs)
    kwargs.pop("activation")
    assert flops.model_flops(model) == flops.convmixer_flops(**kwargs)
    per_layer = flops.layer_flops(model)
    n = kwargs["image_size"] // kwargs["patch_size"]
    assert per_layer["block00_depthwise_conv"] == 2 * n * n * kwargs["hidden_dim"] * kwargs["kernel_size"] ** 2
    assert per_layer["block00_pointwise_conv"] == 2 * n * n * kwargs["hidden_dim"] ** 2


def test_tensorflow_counts_the_same_conv_and_matmul_flops():
    model = build_convmixer(hidden_dim=16, depth=2, kernel_size=3, patch_size=2, num_classes=4, image_size=8)
    by_type = flops.graph_flops(model, image_size=8)
    counted = by_type["Conv2D"] + by_type["DepthwiseConv2dNative"] + by_type["MatMul"]
    assert counted == flops.model_flops(model) == 31_872
    assert sum(by_type.values()) > counted  # TF also counts the elementwise ops the convention leaves out.


def test_peak_table_matches_whole_model_names_only():
    assert flops.peak_tflops("NVIDIA A100-SXM4-80GB", "mixed_bfloat16") == 312.0
    assert flops.peak_tflops("NVIDIA A10", "float32") == 62.5
    assert flops.peak_tflops("Tesla V100-SXM2-16GB", "mixed_bfloat16") is None  # no bf16 units
    assert flops.peak_tflops("NVIDIA L40S", "float32") is None  # not in the table: --peak_tflops
    assert flops.peak_tflops("Intel(R) Xeon(R) CPU", "float32") is None


def _cpuinfo(vendor: str, family: int, model: int, mhz: float, flags: str) -> str:
    return (f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: {model}\n"
            f"cpu MHz\t\t: {mhz:.3f}\nflags\t\t: {flags}\n")


def test_cpu_peak_from_cpuinfo_states_its_formula():
    xeon = _cpuinfo("GenuineIntel", 6, 143, 2100, "fpu sse2 avx avx2 fma avx512f amx_bf16")
    peak, formula = flops.cpu_peak(xeon * 2, cores=2)
    assert peak == pytest.approx(2 * 2.1e9 * 16 * 2 * 2 / 1e12)  # 512-bit: 0.2688 TFLOP/s
    assert "16 fp32 lanes (ISA width)" in formula and "2 FMA units" in formula and "assumed" in formula
    assert flops.cpu_peak(xeon, cores=1, max_mhz=3000)[0] == pytest.approx(3e9 * 64 / 1e12)
    avx2 = "cpu MHz : 1000\nflags : sse2 avx avx2 fma\n"  # no vendor or family: the ISA width
    assert flops.cpu_peak(avx2, cores=4)[0] == pytest.approx(4 * 1e9 * 8 * 2 * 2 / 1e12)
    assert flops.cpu_peak("flags : neon\n", cores=4) is None  # unknown width or clock: --peak_tflops


def test_cpu_peak_knows_256_bit_datapaths_behind_avx512():
    # Zen 4 (family 25, model 17) decodes AVX-512 but executes it on 256-bit units: half the
    # 512-bit formula. Zen 3 (family 25, model 1, AVX2) is 256-bit too, Zen 1 (family 23) 128-bit.
    zen4 = _cpuinfo("AuthenticAMD", 25, 17, 2600, "sse2 avx avx2 fma avx512f avx512_bf16")
    peak, formula = flops.cpu_peak(zen4, cores=2)
    assert peak == pytest.approx(2 * 2.6e9 * 8 * 2 * 2 / 1e12)  # 0.1664, not 0.3328
    assert "8 fp32 lanes (256-bit datapath of Zen 3/Zen 4)" in formula
    zen3 = _cpuinfo("AuthenticAMD", 25, 1, 2450, "sse2 avx avx2 fma")
    assert flops.cpu_peak(zen3, cores=2)[0] == pytest.approx(2 * 2.45e9 * 32 / 1e12)
    zen1 = _cpuinfo("AuthenticAMD", 23, 1, 2000, "sse2 avx avx2 fma")
    assert flops.cpu_peak(zen1, cores=1)[0] == pytest.approx(2e9 * 4 * 2 * 2 / 1e12)
    zen5 = _cpuinfo("AuthenticAMD", 26, 2, 2000, "sse2 avx avx2 fma avx512f")  # full 512-bit units
    assert flops.cpu_peak(zen5, cores=1)[0] == pytest.approx(2e9 * 16 * 2 * 2 / 1e12)


def test_measured_matmul_peak_is_a_positive_rate_in_the_policy_dtype():
    measured = flops.measure_matmul_tflops("float32", size=128, windows=2, window_seconds=0.02)
    assert measured["tflops"] > 0 and measured["tflops_max"] >= measured["tflops"]
    assert measured["dtype"] == "float32" and measured["chain"] >= 1 and len(measured["window_seconds"]) == 2
    assert flops.measure_matmul_tflops("mixed_bfloat16", size=64, windows=1, window_seconds=0.01)["dtype"] == "bfloat16"
