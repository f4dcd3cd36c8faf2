"""Reading raw files from a folder or a zip, and parsing delimited text with pyarrow."""

from __future__ import annotations

import gzip
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv

from prerank.data.recipes.common import RecipeError


@dataclass(frozen=True)
class Source:
    """The files of one raw dataset, by base name: a folder (and its sub-folder ``subdir``) or a zip.

    Zip members are read in memory without extracting; ``name.gz`` is accepted wherever ``name``
    is asked for and decompressed on the fly.
    """

    where: Path
    files: dict[str, str]
    is_zip: bool = False

    @classmethod
    def open(cls, raw: Path, subdir: str) -> Source:
        raw = Path(raw)
        if not raw.exists():
            raise RecipeError(f"raw data path {raw} does not exist")
        if raw.is_file():
            if not zipfile.is_zipfile(raw):
                raise RecipeError(f"{raw} is a file but not a zip archive; pass the folder that holds the raw files")
            with zipfile.ZipFile(raw) as zf:
                members = [m for m in zf.namelist() if not m.endswith("/")]
            return cls(raw, {Path(m).name: m for m in sorted(members, key=len, reverse=True)}, is_zip=True)
        files: dict[str, str] = {}
        for folder in (raw / subdir, raw):  # files directly in raw win over the sub-folder
            if folder.is_dir():
                files.update({p.name: str(p) for p in folder.iterdir() if p.is_file()})
        return cls(raw, files)

    def has(self, name: str) -> bool:
        return name in self.files or f"{name}.gz" in self.files

    def _key(self, name: str) -> str:
        key = name if name in self.files else f"{name}.gz"
        if key not in self.files:
            raise RecipeError(f"{self.where} has no {name}")
        return key

    def describe(self, name: str) -> str:
        """Where ``name`` was found: a path, or ``archive.zip!member``."""
        key = self._key(name)
        return f"{self.where}!{self.files[key]}" if self.is_zip else self.files[key]

    def read(self, name: str) -> bytes:
        key = self._key(name)
        try:
            if self.is_zip:
                with zipfile.ZipFile(self.where) as zf:
                    data = zf.read(self.files[key])
            else:
                data = Path(self.files[key]).read_bytes()
            return gzip.decompress(data) if key.endswith(".gz") else data
        except (OSError, zipfile.BadZipFile, EOFError) as e:
            raise RecipeError(f"cannot read {key} from {self.where}: {e}") from e


def read_delimited(
    data: bytes,
    what: str,
    *,
    delimiter: str,
    names: list[str] | None = None,
    types: dict[str, pa.DataType] | None = None,
    encoding: str = "utf8",
) -> pa.Table:
    """Parse delimited text; ``names=None`` reads a header. ``"::"`` (GroupLens ``.dat``) is allowed.

    Raises :class:`RecipeError` naming ``what`` when the text does not parse.
    """
    if len(delimiter) > 1:
        # pyarrow wants a one-character delimiter; the unit separator never occurs in these files.
        data, delimiter = data.replace(delimiter.encode(), b"\x1f"), "\x1f"
    try:
        return pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(column_names=names, encoding=encoding, block_size=1 << 24),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char=False),
            convert_options=pacsv.ConvertOptions(column_types=types or {}, strings_can_be_null=False),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeDecodeError) as e:
        raise RecipeError(f"{what} is malformed: {e}") from e
