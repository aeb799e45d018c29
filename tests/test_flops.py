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


def test_cpu_peak_from_cpuinfo_states_its_formula():
    xeon = "processor\t: 0\ncpu MHz\t\t: 2100.000\nflags\t\t: fpu sse2 avx avx2 fma avx512f amx_bf16\n"
    peak, formula = flops.cpu_peak(xeon * 2, cores=2)
    assert peak == pytest.approx(2 * 2.1e9 * 16 * 2 * 2 / 1e12)  # 0.2688 TFLOP/s
    assert "16 fp32 lanes" in formula and "2 FMA units" in formula and "assumed" in formula
    assert flops.cpu_peak(xeon, cores=1, max_mhz=3000)[0] == pytest.approx(3e9 * 64 / 1e12)
    avx2 = "cpu MHz : 1000\nflags : sse2 avx avx2 fma\n"
    assert flops.cpu_peak(avx2, cores=4)[0] == pytest.approx(4 * 1e9 * 8 * 2 * 2 / 1e12)
    assert flops.cpu_peak("flags : neon\n", cores=4) is None  # unknown width or clock: --peak_tflops
