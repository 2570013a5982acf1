"""The on-disk indexed multimodal dataset: writer, reader, index helpers and the native extension."""
