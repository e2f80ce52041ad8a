"""Community feature formats: import into features/ (importer, sources) and export from it (exporter)."""

from .exporter import EXPORT_FORMATS, ExportResult, export_features
from .importer import ImportResult, import_features, read_key_map
from .sources import IMPORT_FORMATS

__all__ = ["EXPORT_FORMATS", "IMPORT_FORMATS", "ExportResult", "ImportResult", "export_features",
           "import_features", "read_key_map"]
