"""The API process: the OpenAI-compatible HTTP server (app.py) and the `pagedserve` command
(cli.py)."""


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version("pagedserve")
    except PackageNotFoundError:  # a checkout on PYTHONPATH, never installed
        return "unknown"
