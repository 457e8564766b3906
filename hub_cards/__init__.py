"""Model card templates (Jinja) for calibrations published to the Hugging Face Hub."""
