def pytest_configure(config):
    config.addinivalue_line("markers", "parity: engine vs transformers; scripts/gpu_check.sh runs it as a section")
