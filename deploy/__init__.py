"""Deployment tooling: the helm binary, the chart's generated WorkflowTemplates."""
