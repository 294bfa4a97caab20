"""flowerclf: fine-tune a pretrained image backbone on photo folders, then ask it "what flower is this?".

The sub-packages follow the pipeline, each importing only those before it:
base (torch-free edge) -> data -> models -> runtime -> features -> evaluation -> training -> serving.
"""
