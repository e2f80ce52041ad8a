"""The bundled TERAN model: config, encoders, alignment + loss, data loading, scoring, metrics, checkpoint import."""
