"""The paper's Tables 1 and 2 (Liu et al., PatchScaler), copied verbatim, for the report's comparison.

Values are kept as the paper prints them (strings). The paper does not
say which ManIQA checkpoint or pyiqa version it used: compare trends, not the last digit.
"""

from __future__ import annotations

TABLE1_DATASET = "LSDIR-Test"
TABLE1_COLUMNS = ("PSNR", "SSIM", "LPIPS", "ManIQA", "CLIPIQA", "MUSIQ")
# Table 1: LSDIR-TEST (synthetic, Real-ESRGAN degradations), ×4.
TABLE1: dict[str, tuple[str, ...]] = {
    "RealSR-JPEG": ("22.09", "0.4819", "0.3982", "0.3647", "0.6466", "62.47"),
    "BSRGAN": ("23.74", "0.5748", "0.3336", "0.4069", "0.6853", "69.09"),
    "Real-ESRGAN": ("23.08", "0.5758", "0.3234", "0.4335", "0.6810", "69.91"),
    "SwinIR-GAN": ("23.05", "0.5698", "0.3262", "0.4195", "0.6833", "68.72"),
    "LDM": ("24.14", "0.5630", "0.3323", "0.3466", "0.6735", "61.83"),
    "StableSR": ("23.09", "0.5664", "0.3170", "0.4772", "0.6739", "69.91"),
    "ResShift": ("23.75", "0.5686", "0.3102", "0.5141", "0.6919", "69.62"),
    "DiffBIR": ("23.33", "0.5305", "0.3469", "0.5406", "0.6726", "69.78"),
    "PASD": ("21.02", "0.4940", "0.3651", "0.5177", "0.6847", "71.91"),
    "PatchScaler (paper)": ("22.02", "0.5080", "0.3663", "0.5843", "0.6955", "72.17"),
}

TABLE2_COLUMNS = ("ManIQA", "CLIPIQA", "MUSIQ")
# Table 2: real-world sets, no reference: RealSR (Canon + Nikon, 100 images) and RealSet110.
TABLE2: dict[str, dict[str, tuple[str, ...]]] = {
    "RealSR": {
        "RealSR-JPEG": ("0.1710", "0.5267", "33.69"),
        "BSRGAN": ("0.3787", "0.5512", "63.20"),
        "Real-ESRGAN": ("0.3811", "0.5492", "60.56"),
        "SwinIR-GAN": ("0.3583", "0.5669", "59.23"),
        "LDM": ("0.2631", "0.5617", "47.72"),
        "StableSR": ("0.3992", "0.5350", "61.33"),
        "ResShift": ("0.3821", "0.5694", "58.81"),
        "DiffBIR": ("0.4546", "0.5762", "62.75"),
        "PASD": ("0.4656", "0.5607", "67.44"),
        "PatchScaler (paper)": ("0.5085", "0.5577", "65.02"),
    },
    "RealSet110": {
        "RealSR-JPEG": ("0.3030", "0.7588", "54.03"),
        "BSRGAN": ("0.3870", "0.7918", "67.13"),
        "Real-ESRGAN": ("0.3779", "0.7844", "65.05"),
        "SwinIR-GAN": ("0.3598", "0.8009", "63.92"),
        "LDM": ("0.2834", "0.7628", "55.01"),
        "StableSR": ("0.3856", "0.7851", "62.08"),
        "ResShift": ("0.4011", "0.7584", "62.07"),
        "DiffBIR": ("0.4933", "0.7756", "66.75"),
        "PASD": ("0.4378", "0.7608", "66.03"),
        "PatchScaler (paper)": ("0.5040", "0.8038", "68.27"),
    },
}

# The report shows these baselines next to the paper's PatchScaler row and ours.
REPORT_BASELINES = ("Real-ESRGAN", "StableSR", "ResShift", "DiffBIR", "PASD", "PatchScaler (paper)")


def paper_dataset(name: str) -> str | None:
    """Which paper set a dataset name is: ``lsdir``/``lsdir-test…`` -> LSDIR-Test, ``realsr``/``realsr-v3…``
    -> RealSR, ``realset110…`` -> RealSet110; None otherwise (``realset65`` is another set and is never
    compared with RealSet110's row)."""
    low = name.lower().replace("_", "-")
    if low == "lsdir" or low.startswith("lsdir-test"):
        return TABLE1_DATASET
    if low.startswith("realset110") or low.startswith("realset-110"):
        return "RealSet110"
    if low == "realsr" or low.startswith(("realsr-v3", "realsrv3", "realsr-test")):
        return "RealSR"
    return None


def paper_rows(dataset: str) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]]:
    """(column names, {method: values}) of the paper table for ``dataset`` (a paper set name)."""
    if dataset == TABLE1_DATASET:
        return TABLE1_COLUMNS, TABLE1
    return TABLE2_COLUMNS, TABLE2[dataset]
