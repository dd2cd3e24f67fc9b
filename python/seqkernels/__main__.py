"""``python -m seqkernels``: print the build facts."""

from ._info import format_build_info

if __name__ == "__main__":
    print(format_build_info())
