"""The codec's tests need no I/O: under the project-wide leak guard (tests/conftest.py) and
warnings-as-errors (pyproject.toml), nothing may leak and nothing may warn."""
