"""The on-disk contracts host and device share: delta files, the GGUF reader, the base manifest and
fingerprint, architecture cards and tensor names. numpy, gguf and the standard library only."""
