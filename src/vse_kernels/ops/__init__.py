"""One sub-package per op: `naive.py` is the plain-PyTorch reference, `op.py` the registered op and its
public function, and the kernels sit beside them (csrc/<op>/ for the C++/CUDA ones)."""
