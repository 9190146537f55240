"""pacs-ai: a DICOM-AI gateway for chest X-ray and CT triage."""

__version__ = "0.1.0"
