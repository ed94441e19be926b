"""Audio modality: transforms (pure: file bytes -> fixed-length int16 clip) and the spoken-digits demo data."""
