"""Client-level differential privacy and secure aggregation for federated rounds.

:mod:`fedsim.privacy.dp` (clipping, Gaussian noise on the sum, adaptive clipping),
:mod:`fedsim.privacy.accounting` (ε(δ) with Google's ``dp_accounting``, RDP and PLD),
:mod:`fedsim.privacy.shamir` and :mod:`fedsim.privacy.secagg` (Bonawitz et al. 2017 secure
aggregation over Z_{2^k}, simulated message by message). Pure library code: no Ray, no engine.
"""
