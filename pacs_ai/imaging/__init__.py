"""Decode, Modality/VOI LUT, windows, CT volumes, gating, resize: pure functions on arrays.

Modules: :mod:`.decode` (read and decode with limits), :mod:`.lut` (the VOI policy),
:mod:`.geometry` (spacing, letterbox), :mod:`.ct` (HU, ordering), :mod:`.gating`
(applicability), :mod:`.prepare` (file to model input, shared by training and inference).
"""
