"""Developer diagnostics of nmattn's kernels: probes, SASS readers, A/B timing.

Not installed with the package and never imported by `nmattn`,
`pallas_kernels` or `experiments`; run from the repository root as
`python -m tools.<module>`.
"""
