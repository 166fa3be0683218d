"""One module per op: its backends, its ``torch.library`` custom ops (what ``torch.compile``
sees), its autograd function, and the dispatch between the Triton kernels
(``cage_kernels``) and the pure-torch reference (``cage.naive``).

- ``fake_quant``: the QuEST fake quantizer, forward ``Q(x)`` and the masked straight-through
  backward;
- ``packed_linear``: the converted layer's matmul with the weight read as packed codes;
- ``adamw_cage``: the CAGE-AdamW step of a parameter group (reference, traced and fused
  paths, and the cached launch plan of the fused one).

Nothing here imports Triton at module import: the kernels are looked up the first time a
Triton path runs.
"""
