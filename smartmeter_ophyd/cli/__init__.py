"""The ``smartmeter`` command line (see ``__main__``); :func:`default_data_dir` is where it keeps
the embedded catalog, the meters' HDF5 files and the plots."""

from ._common import default_data_dir

__all__ = ["default_data_dir"]
