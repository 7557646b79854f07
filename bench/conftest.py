"""pytest settings for the benchmark suites in bench/.

pyproject's addopts carry ``--benchmark-skip`` so plain test runs never time anything; passing
``--benchmark-enable`` explicitly turns the benchmarks back on for this folder.
"""


def pytest_configure(config):
    if getattr(config.option, "benchmark_enable", False):
        config.option.benchmark_skip = False
