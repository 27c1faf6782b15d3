"""Guest images: the value a VM is created from (``image``, a leaf), building images from assembly
(``asm`` with ``preproc``, ``expr``, ``operands``, ``verify``), and ``load_guest`` (``load``)."""
