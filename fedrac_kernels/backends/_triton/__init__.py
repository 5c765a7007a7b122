"""Triton kernels of the ``triton`` back end (one op per module).

* :mod:`.aggregate` -- dense / structured / compact masked-mean aggregation. One program owns a
  ``BLOCK`` of contiguous parameters, loops over the K clients in order inside the program,
  accumulates num/den in float32 registers and stores once: bit-identical to ``torch_ref``.
* :mod:`.frequency` -- frequency-table updates (dense masks, or nested rank/sizes in O(N + K)).
* :mod:`.sort` -- stable ascending argsort (single-program packed bitonic sort for small N, LSD
  radix sort built from histogram + scan + stable-scatter kernels for large N).
* :mod:`.nested` -- nested prefix masks ``[S, N]`` from an order and sizes.
* :mod:`.common` -- shared helpers: dtype maps, row-pointer tables, the int32 prefix scan.
* :mod:`.aot` -- representative compile specs of every kernel (``tests/test_triton_aot.py``).

Importing these modules requires triton; :mod:`fedrac_kernels.backends.triton_backend` imports
them lazily so that it can report, rather than raise, when triton is missing. Whether a kernel
runs compiled or in the interpreter is fixed when its module is imported (``TRITON_INTERPRET=1``
must be set before the first import).
"""
