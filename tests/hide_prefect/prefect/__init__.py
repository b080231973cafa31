raise ImportError("hidden by the test: this environment has no Prefect")
