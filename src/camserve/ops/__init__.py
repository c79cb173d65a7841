"""Operations beside serving: the audit log, handler metrics and process tuning."""
