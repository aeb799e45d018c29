"""Performance tools: end-to-end benchmark, kernel and augmentation micro-benchmarks, profile report,
FLOPs and device peaks. They use the training library; the library never imports them."""
