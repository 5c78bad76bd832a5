"""Offline building of the Reference Texture Memory (RTM, section 3.3 and appendix B.2 of the paper).

``patchscaler build-rtm --source NAME=DIR_OR_S3[:WEIGHT] ... --out DIR_OR_S3 --weights DIR`` turns texture
images into an RTM artifact that ``patchscaler.weights.load_rtm`` (and so the upscaler and the pipeline)
reads from a local folder or an ``s3://`` prefix:

1. ``sources``: each source is a named local folder or ``s3://`` prefix with a weight; every file under
   it is an input.
2. ``crop``: every file is probed (read and decoded once, in Ray tasks); bad files (zero-byte, corrupt,
   truncated, not an image, too large) and images smaller than 128×128 are skipped and counted, grey /
   palette / CMYK / alpha / 16-bit images are converted to 8-bit RGB and counted. Then random 128×128
   crops are planned in the driver, deterministically for ``--seed``: 20,000 by default, split over the
   sources by weight, uniform over the distinct windows of each source.
3. ``encode``: a Ray Data actor pool (one GPU per actor when the cluster has GPUs) cuts the crops and
   encodes them: RTM value = autoencoder latent (4, 16, 16), RTM key = L2-normalised texture-classifier
   feature, plus the predicted texture class.
4. ``fps``: exact farthest point sampling keeps 2,000 of them (``--entries``), in torch on the device, in
   O(N) memory, so 100k+ candidates fit.
5. ``artifact``: ``rtm.safetensors`` + ``manifest.json`` (via ``patchscaler.weights.save_rtm``),
   ``entries.parquet``, ``index.faiss``, the whole candidate pool ``candidates.parquet`` and
   ``contact_sheet.png`` (``contact_sheet``: decoded entries grouped by texture class, like Fig. 8).
6. ``--add-source NAME=DIR_OR_S3`` extends an artifact: only the new sources' crops are encoded; they join
   the stored candidate pool and FPS runs again over the whole pool.

``build.build_rtm(BuildConfig(...))`` is the entry point from Python; ``build.py`` is the only module that
sets Ray resources, pool sizes and batch sizes. This ``__init__`` imports nothing heavy, so that the
``patchscaler`` command's argument parsing stays fast.
"""

DEFAULT_CANDIDATES = 20_000
DEFAULT_ENTRIES = 2_000
