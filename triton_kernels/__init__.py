"""AutoSculpt's Triton kernels (installed as ``autosculpt.triton_kernels``).

Deliberately empty of imports: importing this package must not import triton. Load a kernel module
with ``autosculpt._triton.kernels("<module>")``.
"""
