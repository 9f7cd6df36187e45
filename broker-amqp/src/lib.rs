//! RabbitMQ / AMQP 0-9-1 broker: durable queues, publisher confirms, manual acks, dead-letter exchange (in progress).
