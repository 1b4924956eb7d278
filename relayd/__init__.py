"""relayd: a privacy-preserving business-chat relay on RabbitMQ."""

__version__ = "0.1.0"
