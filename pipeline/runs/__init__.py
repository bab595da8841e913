"""What every command shares about a run: its checkpoint folders (`checkpoints`), the final model
file (`model_file`), MLflow tracking (`tracking`) and the store the tools read (`store`), and
the one table writer (`table`). Training writes them; evaluation and the tools read them.
"""
