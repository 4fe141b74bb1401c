"""GPU benchmark of the stock transformers pipeline vs our engine modes (issue 7).

`python -m flashdrive_ros.bench --shape tiny|full --steps N --out DIR` (also `flashdrive-bench`).
Weights are random (bf16 on CUDA): timings only, no accuracy meaning.
"""
