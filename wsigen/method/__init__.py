"""The pure method (design.md §2): EDM schedule and solver steps, relaxed projection, grid
arithmetic, keyed randomness, stage planning and the step loop over a band. No file, process or
terminal code: tensors in, tensors out."""
