"""Kernel backends of the layer ops: ``compiled_ops`` (C++/CUDA in ``iwd_fast._C``, loaded by
``compiled_ext``) and ``triton_ops`` (the Triton launchers of ``iwd_fast.kernels``). The eager backend is
``iwd_fast.scoring.eager_ops`` itself. Backends never import each other and are imported lazily by
``iwd_fast.scoring.dispatch``."""
