"""The sanitizer run (scripts/sanitize.sh) really runs on an instrumented extension: outside that
run (L2R_EXPECT_SANITIZED unset) this file has nothing to check."""

import os
import shutil
import subprocess

import pytest

import l2r_cuda

pytestmark = pytest.mark.skipif(os.environ.get("L2R_EXPECT_SANITIZED") != "1",
                                reason="only in scripts/sanitize.sh")


def test_extension_is_instrumented():
    so = l2r_cuda._C.__file__
    nm = shutil.which("nm")
    assert nm is not None
    symbols = subprocess.run([nm, "-D", so], capture_output=True, text=True, check=True).stdout
    assert "__asan_report" in symbols, f"{so} is not built with AddressSanitizer"
    assert "__ubsan_handle" in symbols, f"{so} is not built with UBSan"


def test_the_extension_is_the_copy_under_test():
    assert "build/sanitize/src" in l2r_cuda._C.__file__.replace(os.sep, "/")
