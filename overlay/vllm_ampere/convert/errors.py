"""The one exception the converter raises for bad input: it names the file and the tensor."""

from __future__ import annotations


class ConversionError(ValueError):
    """Bad input or a failed step; the message names the shard file and tensor when known."""

    def __init__(self, message: str, *, file: str | None = None, tensor: str | None = None):
        self.file = file
        self.tensor = tensor
        where = ", ".join(p for p in (f"file {file}" if file else "", f"tensor {tensor}" if tensor else "") if p)
        super().__init__(f"{message} ({where})" if where else message)
