"""HTTP edges: the Segment-compatible Tracking API (`tracking`), served by `server` (uvicorn)."""

__all__: list[str] = []
