"""flowerclf: fine-tune a pretrained image backbone on photo folders, then ask it "what flower is this?".

The sub-packages follow the pipeline, each importing only those before it:
base (torch-free edge) -> runtime -> data -> models -> features -> evaluation -> training -> serving.
"""
