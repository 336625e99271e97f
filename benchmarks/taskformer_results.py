"""Former name of :mod:`benchmarks.results_taskformer` (``python -m benchmarks.taskformer_results`` still works)."""

from benchmarks.results_taskformer import main

if __name__ == "__main__":
    main()
