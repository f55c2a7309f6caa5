"""The pages people see: refusal and error pages (ja/en); later the device check and audit views."""
