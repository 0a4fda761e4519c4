"""hermitkit: run and judge the HermitBench autonomy experiment."""

__version__ = "0.1.0"
