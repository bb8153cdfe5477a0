"""Find the patients and their smear fields below a lab folder.

A lab folder looks like ``DIR/<patient>/.../*.jpg``. Every readable image below a patient's folder
counts for that patient. ``per_image=True`` treats every image (anywhere below DIR) as its own
patient, named after the file (ALL-IDB1 style). Files that are not read are listed with the reason.
"""

from __future__ import annotations

from pathlib import Path

from PIL import features

from allmil_cli.types.field import Patient

#: Formats read as smear fields; WebP joins when this Pillow build has it.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"} | ({".webp"} if features.check("webp") else set()))
#: Operating-system clutter, skipped and listed as "hidden or system file".
JUNK_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini", "ehthumbs.db", "icon\r"})


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def skip_reason(path: Path, root: Path) -> str | None:
    """Why a file below ``root`` is not analysed (None: it is a smear field to read)."""
    parts = path.relative_to(root).parts
    if path.name.lower() in JUNK_NAMES or any(p.startswith((".", "__MACOSX")) for p in parts):
        return "skipped: hidden or system file"
    if path.is_symlink() and not path.exists():
        return "skipped: broken link (its target is missing); re-create the link or copy the image"
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        what = f"'{suffix}'" if suffix else "no file extension"
        webp = " (this Pillow build cannot read WebP)" if suffix == ".webp" else ""
        return (f"skipped: unsupported format ({what}){webp}; export the field as JPEG, PNG or TIFF"
                + (", or add the right extension" if not suffix else ""))
    return None


def _scan(folder: Path) -> tuple[list[Path], list[dict[str, str]]]:
    """Images below ``folder`` (sorted) and the files skipped there, each with its reason."""
    images: list[Path] = []
    skipped: list[dict[str, str]] = []
    for p in sorted(folder.rglob("*"), key=lambda q: str(q)):
        if p.is_dir():
            continue
        reason = skip_reason(p, folder)
        if reason is None and p.is_file():
            images.append(p)
        elif reason is not None:
            skipped.append({"file": str(p.relative_to(folder)), "reason": reason})
    return images, skipped


def _images_below(folder: Path) -> list[Path]:
    return _scan(folder)[0]


def discover_patients(root: Path, per_image: bool = False) -> tuple[list[Patient], list[str]]:
    """List the patients under ``root``. Returns (patients, warnings for the user).

    Raises FileNotFoundError / NotADirectoryError when ``root`` itself is unusable.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such folder. Give the folder that holds one subfolder per patient.")
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a folder. Give the folder that holds one subfolder per patient.")
    notes: list[str] = []
    if per_image:
        images, skipped = _scan(root)
        patients = [Patient(name=str(p.relative_to(root).with_suffix("")), folder=p.parent, images=[p]) for p in images]
        shown = [s for s in skipped if "hidden" not in s["reason"]]
        if shown:
            notes.append(f"{root}: {len(shown)} file(s) skipped, e.g. {shown[0]['file']}: {shown[0]['reason']}.")
        return patients, notes
    loose = sorted(p for p in root.iterdir() if p.is_file() and _is_image(p))
    if loose:
        notes.append(
            f"{root}: {len(loose)} image(s) lie directly in the input folder and are ignored; "
            "put each patient's images in its own subfolder, or pass --per-image to treat each image as a patient."
        )
    patients = []
    for sub in sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name):
        images, skipped = _scan(sub)
        patients.append(Patient(name=sub.name, folder=sub, images=images, skipped=skipped))
    return patients, notes
